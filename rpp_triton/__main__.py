import sys

from rpp_triton.cli import main

sys.exit(main())
