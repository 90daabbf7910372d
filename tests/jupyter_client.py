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


def contents(connection, path, model=None):
    """GET a file's model from the server's contents API, or PUT `model` there, as the
    notebook page does when a user opens or saves it."""
    url = f"{connection['url']}api/contents/{path}"
    headers = {"Authorization": f"token {connection['token']}"}
    if model is None:
        response = requests.get(url, headers=headers, timeout=10)
    else:
        response = requests.put(url, headers=headers, json=model, timeout=10)
    assert response.status_code in (200, 201), f"{path}: {response.status_code} {response.text[:300]}"
    return response.json()


def edit_notebook(connection, path, text):
    """Add a markdown cell saying `text` to a notebook, through the server, and save it."""
    model = contents(connection, path)
    model["content"]["cells"].append({"cell_type": "markdown", "metadata": {}, "source": text})
    contents(connection, path, {"type": "notebook", "format": "json", "content": model["content"]})


def new_notebook(connection, path, text):
    notebook = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": text}], "metadata": {}, "nbformat": 4, "nbformat_minor": 4}
    contents(connection, path, {"type": "notebook", "format": "json", "content": notebook})
