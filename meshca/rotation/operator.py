"""What ``meshca ca`` needs to know before it runs: light enough for every command's parser.

The rest of ``meshca.rotation`` loads the scheduler and the event loop, which commands
that never rotate should not pay for at start-up.
"""

ADMIN_SOCKET = "admin.sock"  # in the data directory; how a running server is reached
LAST_STEP = 5  # root rotation runs steps 1 to LAST_STEP
