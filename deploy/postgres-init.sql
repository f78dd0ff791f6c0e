-- The application database, next to Temporal's own databases on the same server.
CREATE USER microupdates WITH PASSWORD 'microupdates';
CREATE DATABASE microupdates OWNER microupdates;
