import sys

from trt_latency.cli import main

sys.exit(main())
