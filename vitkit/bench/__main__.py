import sys

from vitkit.bench import bench_main

sys.exit(bench_main())
