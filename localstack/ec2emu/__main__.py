"""python -m ec2emu --host 127.0.0.1 --port 5000 --region us-west-2"""

import argparse
import logging
import signal
import sys


def main():
    ap = argparse.ArgumentParser(prog="ec2emu", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--region", default="us-west-2")
    args = ap.parse_args()

    from moto.moto_server.werkzeug_app import create_backend_app
    from werkzeug.serving import run_simple

    from . import ec2, imds
    from .app import EmulatorApp

    ec2.install()
    imds.CONFIG["region"] = args.region
    app = EmulatorApp(create_backend_app("ec2"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    print(f"ec2emu: EC2 + IMDS on http://{args.host}:{args.port} (region {args.region})", flush=True)
    run_simple(args.host, args.port, app, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
