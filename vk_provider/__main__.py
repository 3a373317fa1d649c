"""``python -m vk_provider``."""

import sys

from vk_provider.cli import main

sys.exit(main())
