import sys

from diffusion_runtime.cli import main

sys.exit(main())
