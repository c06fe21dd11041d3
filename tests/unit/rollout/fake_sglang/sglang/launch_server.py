"""A fake SGLang server: the routes, request checks and reply shapes our engine relies on.

Generation is deterministic and driven by the loaded weights, so a test can tell which weights
served a request: each sample repeats the prompt's last token `max_new_tokens` times, and every
token's log-prob is minus the sum of all loaded tensors' elements (0 before any load). Every
request is appended to `<log dir>/requests.jsonl` for the test to inspect.

Weights arrive from a file (`/update_weights_from_disk`) or, as on SGLang's distributed path,
through a real weight-update group (gloo): `/init_weights_update_group` joins it as the server's
one rank, `rank_offset` (other servers may hold other ranks of the same group), and
`/update_weights_from_distributed` receives the named tensors by broadcast, in order. Both block
inside the request, as SGLang's do, while the trainer forms the group or sends;
ThreadingHTTPServer answers other requests meanwhile.
"""

import argparse
import base64
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

GENERATE_KEYS = {"input_ids", "sampling_params", "return_logprob", "logprob_start_len", "return_sampling_mask",
                 "sampling_logprobs_mode", "return_routed_experts", "routed_experts_start_len"}
REQUIRED = {"/update_weights_from_disk": {"model_path"}, "/update_weights_from_tensor": {"serialized_named_tensors"},
            "/update_weights_from_distributed": {"names", "dtypes", "shapes"},
            "/init_weights_update_group": {"master_address", "master_port", "rank_offset", "world_size"},
            "/release_memory_occupation": set(), "/resume_memory_occupation": set(), "/generate": {"input_ids"}}


def parse_args():
    parser = argparse.ArgumentParser()
    for flag in ("--model-path", "--host", "--port", "--dtype", "--tp-size"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--api-key")  # without it (as `mgrpo launch` starts servers) any client is served
    for flag in ("--skip-server-warmup", "--enable-memory-saver", "--enable-return-routed-experts"):
        parser.add_argument(flag, action="store_true")
    return parser.parse_args()


class State:
    weights = {}  # name -> tensor: what has been loaded, by either path
    logprob = 0.0
    version = "default"
    groups = {}  # group name -> the weight-update process group joined
    tp_size = 1


def load(tensors):
    State.weights.update(tensors)
    State.logprob = -float(sum(t.double().sum() for t in State.weights.values()))


def load_from_disk(body):
    from safetensors.torch import load_file

    load(load_file(str(Path(body["model_path"]) / "model.safetensors")))
    return 200, {"success": True, "message": "ok"}


def join_group(body):
    """Join as the server's only rank (TP rank 0) at `rank_offset`; refused as SGLang would
    (400, success false) for a group it cannot join, e.g. one whose name it already holds."""
    from weight_group import join_weight_group  # beside this package, on the same PYTHONPATH

    rank, world_size = body["rank_offset"], body["world_size"]
    if State.tp_size != 1 or not 1 <= rank < world_size or body.get("backend", "nccl") != "gloo":
        return 400, {"success": False, "message": f"the fake server is one gloo rank (--tp-size 1) at rank_offset "
                                                  f"1..world_size-1; got tp {State.tp_size}, {body}"}
    name = body.get("group_name", "weight_update_group")
    try:
        State.groups[name] = join_weight_group(body["master_address"], body["master_port"], rank, world_size, name,
                                               "gloo", timeout_s=60)
    except Exception as err:
        return 400, {"success": False, "message": f"Failed to initialize custom process group: {err}."}
    return 200, {"success": True, "message": "joined"}


def receive_weights(body):
    """Receive the bucket's tensors in the order named, then load them as a disk load would."""
    import torch
    import torch.distributed as dist

    group = State.groups.get(body.get("group_name", "weight_update_group"))
    if group is None:
        return 400, {"success": False, "message": f"no weight group {body.get('group_name')!r}: join it first"}
    tensors = {}
    for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
        tensors[name] = torch.empty(shape, dtype=getattr(torch, dtype))
        dist.broadcast(tensors[name], src=0, group=group)
    load(tensors)
    return 200, {"success": True, "message": "ok"}


WEIGHT_ROUTES = {"/update_weights_from_disk": load_from_disk, "/init_weights_update_group": join_group,
                 "/update_weights_from_distributed": receive_weights}


def generate(body):
    params = body.get("sampling_params") or {}
    unknown = set(body) - GENERATE_KEYS
    if unknown or not isinstance(body["input_ids"], list) or not body["input_ids"]:
        return 400, {"error": f"bad generate request: unknown {sorted(unknown)}"}
    outputs = []
    for _ in range(params.get("n", 1)):
        ids = [body["input_ids"][-1]] * params["max_new_tokens"]
        meta = {"finish_reason": {"type": "length", "length": len(ids)}, "weight_version": State.version,
                "output_token_logprobs": [[State.logprob, token, None] for token in ids]}
        if body.get("return_sampling_mask"):
            meta["output_token_sampling_logprobs"] = [State.logprob / 2] * len(ids)
        if body.get("return_routed_experts"):  # 2 layers, top-2: ids = token position
            positions = len(body["input_ids"]) + len(ids) - 1
            raw = b"".join(int(p).to_bytes(4, "little") * 4 for p in range(positions))
            meta["routed_experts"] = base64.b64encode(raw).decode()
        outputs.append({"text": "x" * len(ids), "output_ids": ids, "meta_info": meta})
    return 200, outputs if len(outputs) > 1 else outputs[0]


def main():
    args = parse_args()
    State.tp_size = int(args.tp_size)
    log = Path(os.environ["FAKE_SGLANG_DIR"])
    fail_next = log / "fail_next"  # a test creates it to make the next /generate answer 503

    class Handler(BaseHTTPRequestHandler):
        def authorized(self):
            if args.api_key and self.headers.get("Authorization") != f"Bearer {args.api_key}":
                self.reply(401, {"error": "bad api key"})
                return False
            return True

        def do_GET(self):
            if not self.authorized():
                return
            if self.path == "/model_info":
                return self.reply(200, {"weight_version": State.version})
            self.reply(200 if self.path == "/health" else 404, {})

        def do_POST(self):
            if not self.authorized():
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"null") or {}
            with open(log / "requests.jsonl", "a") as out:
                out.write(json.dumps({"route": self.path, "body": body}) + "\n")
            missing = REQUIRED.get(self.path, {"?"}) - set(body)
            if missing:
                return self.reply(400, {"error": f"{self.path}: missing {sorted(missing)}"})
            if self.path == "/generate":
                if fail_next.exists():
                    fail_next.unlink()
                    return self.reply(503, {"error": "overloaded"})
                return self.reply(*generate(body))
            route = WEIGHT_ROUTES.get(self.path, lambda _: (200, {"success": True, "message": "ok"}))
            status, reply = route(body)
            if status == 200 and "weight_version" in body:
                State.version = body["weight_version"]
            self.reply(status, reply)

        def reply(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    print(f"fake sglang serving {args.model_path} tp={args.tp_size}", flush=True)
    ThreadingHTTPServer((args.host, int(args.port)), Handler).serve_forever()


if __name__ == "__main__":
    sys.exit(main())
