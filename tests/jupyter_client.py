"""Talk to a running Jupyter server as a browser would: REST for kernels, websocket for code."""

import json
import uuid

import requests
import websocket


def api(url, path, token=None, method="GET", timeout=10):
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.request(method, f"{url}{path}", headers=headers, timeout=timeout)


def execute(url, token, code, timeout=60):
    """Start a kernel, run `code` in it, return what it printed or evaluated to."""
    response = api(url, "api/kernels", token, method="POST")
    response.raise_for_status()
    kernel_id = response.json()["id"]
    ws_url = url.replace("http://", "ws://", 1) + f"api/kernels/{kernel_id}/channels"
    channel = websocket.create_connection(ws_url, header=[f"Authorization: token {token}"], timeout=timeout)
    try:
        msg_id = uuid.uuid4().hex
        channel.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "msg_type": "execute_request",
                        "username": "test",
                        "session": uuid.uuid4().hex,
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False},
                    "channel": "shell",
                    "buffers": [],
                }
            )
        )
        output = []
        while True:
            message = json.loads(channel.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                output.append(content["text"])
            elif kind == "execute_result":
                output.append(content["data"]["text/plain"])
            elif kind == "error":
                raise AssertionError(f"kernel error: {content['ename']}: {content['evalue']}")
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(output).strip()
    finally:
        channel.close()
        api(url, f"api/kernels/{kernel_id}", token, method="DELETE")
