"""The emulator's HTTP front: EC2 query API (moto, patched), IMDS under /latest/, and a
control endpoint under /_emulator/ for fault injection, call counts and IMDS settings."""

import io
import json
import random
import threading
import time
import uuid
from urllib.parse import parse_qs

from . import ec2, imds

FAULTS_LOCK = threading.Lock()
# action -> {"code", "status", "message", "probability", "count" (None = forever), "latency_ms"}
FAULTS = {}
CALLS = {}

# EC2's statuses for the errors tests inject most.
DEFAULT_STATUS = {
    "RequestLimitExceeded": 503,
    "InternalError": 500,
    "ServiceUnavailable": 503,
    "Unavailable": 503,
    "InsufficientFreeAddressesInSubnet": 400,
    "InsufficientCidrBlocks": 400,
}


def ec2_error_xml(code, message):
    rid = str(uuid.uuid4())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
        f"<RequestID>{rid}</RequestID></Response>"
    )


def _json(start_response, status, obj):
    body = json.dumps(obj).encode()
    start_response(
        f"{status} {'OK' if status < 400 else 'Error'}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]


class EmulatorApp:
    def __init__(self, moto_app):
        self.moto_app = moto_app

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path.startswith("/latest/"):
            headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")}
            status, ctype, body, *extra = imds.handle(method, path, headers, environ.get("REMOTE_ADDR"))
            start_response(f"{status} X", [("Content-Type", ctype), *(extra[0] if extra else [])])
            return [body.encode()]
        if path.startswith("/_emulator/"):
            return self.control(environ, start_response, method, path)
        return self.ec2(environ, start_response)

    # --- EC2 ---------------------------------------------------------------------
    def ec2(self, environ, start_response):
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        params = parse_qs(body.decode("utf-8", "replace"))
        params.update(parse_qs(environ.get("QUERY_STRING", "")))
        action = (params.get("Action") or [""])[0]
        with FAULTS_LOCK:
            CALLS[action] = CALLS.get(action, 0) + 1
            fault = FAULTS.get(action) or FAULTS.get("*")
            fire = False
            latency = 0.0
            if fault and (fault["count"] is None or fault["count"] > 0):
                latency = fault.get("latency_ms", 0) / 1000.0
                if fault.get("code") and random.random() < fault.get("probability", 1.0):
                    fire = True
                    if fault["count"] is not None:
                        fault["count"] -= 1
                elif not fault.get("code") and fault["count"] is not None:
                    fault["count"] -= 1
        if latency:
            time.sleep(latency)
        if fire:
            status = int(fault.get("status") or DEFAULT_STATUS.get(fault["code"], 400))
            msg = fault.get("message") or f"Injected by the emulator for {action}."
            start_response(f"{status} Error", [("Content-Type", "text/xml")])
            return [ec2_error_xml(fault["code"], msg).encode()]
        answer = {}

        def capture(status, headers, exc_info=None):
            answer["status"], answer["headers"] = status, headers

        with ec2.LOCK:
            out = self.moto_app(environ, capture)
            # Materialise inside the lock: moto builds the body lazily.
            body = b"".join(out)
        headers = answer.get("headers", [])
        if action == "DescribeNetworkInterfaces" and ec2.SETTINGS.get("describe_primary_unflagged"):
            body = body.replace(b"<primary>true</primary>", b"<primary>false</primary>")
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        start_response(answer.get("status", "500 Error"), headers)
        return [body]

    # --- control -----------------------------------------------------------------
    def control(self, environ, start_response, method, path):
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        raw = environ["wsgi.input"].read(length) if length else b""
        try:
            data = json.loads(raw) if raw else {}
        except ValueError as e:
            return _json(start_response, 400, {"error": f"body is not JSON: {e}"})
        if path == "/_emulator/health":
            return _json(start_response, 200, {"ok": True})
        if path == "/_emulator/calls":
            with FAULTS_LOCK:
                if method == "DELETE":
                    CALLS.clear()
                return _json(start_response, 200, dict(CALLS))
        if path == "/_emulator/faults":
            with FAULTS_LOCK:
                if method == "DELETE":
                    FAULTS.clear()
                elif method == "POST":
                    action = data.get("action")
                    if not action:
                        return _json(start_response, 400, {"error": "fault needs 'action' (an EC2 action or '*')"})
                    p = float(data.get("probability", 1.0))
                    if not 0.0 <= p <= 1.0:
                        return _json(start_response, 400, {"error": "probability must be within 0..1"})
                    FAULTS[action] = {
                        "code": data.get("code"),
                        "status": data.get("status"),
                        "message": data.get("message"),
                        "probability": p,
                        "count": data.get("count"),
                        "latency_ms": float(data.get("latency_ms", 0)),
                    }
                return _json(start_response, 200, FAULTS)
        if path == "/_emulator/imds":
            if method == "POST":
                for k in ("instance_id", "delay_seconds", "region", "unavailable"):
                    if k in data:
                        if k == "delay_seconds":
                            imds.CONFIG[k] = float(data[k])
                        elif k == "unavailable":
                            imds.CONFIG[k] = bool(data[k])
                        else:
                            imds.CONFIG[k] = data[k]
            return _json(start_response, 200, imds.CONFIG)
        if path == "/_emulator/settings":
            if method == "POST":
                if "detach_seconds" in data:
                    ec2.SETTINGS["detach_seconds"] = float(data["detach_seconds"])
                for k in ("assign_echoes_primary", "describe_primary_unflagged"):
                    if k in data:
                        ec2.SETTINGS[k] = bool(data[k])
            return _json(start_response, 200, ec2.SETTINGS)
        return _json(start_response, 404, {"error": f"unknown control path {path}"})
