from harness.sweep import main
import sys

sys.exit(main())
