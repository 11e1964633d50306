"""Start Concept Studio in the browser: python app.py [--host H] [--port P] [--share]."""

import argparse

from studio.ui import launch

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Concept Studio")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 on a Space)")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--share", action="store_true", help="create a public link")
    args = parser.parse_args()
    launch(host=args.host, port=args.port, share=args.share)
