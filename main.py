"""Run Alfred: `python main.py` serves, `python main.py simulate --from N --text T` plays Meta."""

import sys

from alfred_bot.cli import main

if __name__ == "__main__":
    sys.exit(main())
