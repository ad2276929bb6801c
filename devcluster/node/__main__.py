import sys

from devcluster.node.agent import main

sys.exit(main())
