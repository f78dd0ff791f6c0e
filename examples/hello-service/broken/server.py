"""Release 1.2.0 of the example service, with a start-up bug: it needs a settings file that no release ships."""

import json
from pathlib import Path

SETTINGS = json.loads((Path(__file__).resolve().parent / "settings.json").read_text())
