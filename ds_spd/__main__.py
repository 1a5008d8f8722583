import sys

from ds_spd.cli import main

sys.exit(main())
