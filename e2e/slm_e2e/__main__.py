import sys

from slm_e2e.cluster import main

sys.exit(main())
