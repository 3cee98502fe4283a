"""`python -m data_engine --config FILE[:ARG] --output DIR` (same as `chatrex-jax data-engine`)."""
import sys

from data_engine.main import main

sys.exit(main())
