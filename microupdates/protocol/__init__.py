"""Wire models shared by the server and the device agent (Python 3.9 compatible, no server imports)."""
