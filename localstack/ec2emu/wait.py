"""Wait until a real EC2 call (DescribeInstanceTypes) succeeds on the endpoint."""

import sys
import time
import urllib.request


def main():
    endpoint, timeout = sys.argv[1], float(sys.argv[2])
    deadline = time.monotonic() + timeout
    body = b"Action=DescribeInstanceTypes&Version=2016-11-15&InstanceType.1=m5.large"
    last = None
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(endpoint, data=body, method="POST")
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200 and b"m5.large" in r.read():
                    return 0
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.05)
    print(f"emulator did not answer DescribeInstanceTypes within {timeout:.0f} s: {last}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
