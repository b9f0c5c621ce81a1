"""`python -m fastfuse` is the `fastfuse` command."""
import sys

from fastfuse.cli import main

sys.exit(main())
