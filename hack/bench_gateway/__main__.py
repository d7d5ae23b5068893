"""`python3 -m hack.bench_gateway`: runs the gateway benchmark (see the package's docstring)."""
import sys

from .main import main

sys.exit(main())
