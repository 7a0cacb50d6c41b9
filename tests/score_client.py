"""The --eval-cmd of tests/test_soup.py: ``python -I score_client.py SOCKET ITEMS MODEL``.

Asks the test process's scorer (``scorer`` in tests/test_soup.py) for
``distmerge.skills.score_all(MODEL, ITEMS)`` and prints it as ``python -m distmerge.skills
score --json --items ITEMS MODEL`` does. Standard library only: it starts in milliseconds,
where the command it stands for imports torch (3-4 s).
"""

import json
import socket
import sys

if __name__ == "__main__":
    path, items, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(600)
        s.connect(path)
        s.sendall(json.dumps({"model": model, "items": items}).encode() + b"\n")
        reply = json.loads(s.makefile("rb").readline())
    if "error" in reply:
        sys.exit(f"score {model}: {reply['error']}")
    print(reply["ok"])
