"""Fault-injecting stand-in SLM for tests: answers with a call to the request's first tool.

The flag file (config parameter FAULT_FILE, or env SLM_FAULT_FILE) holds "" (healthy),
"slow:<ms>" (sleep before answering) or "error" (fail every request).
"""

import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        param = cfg.get("parameters", {}).get("FAULT_FILE", {}).get("string_value", "")
        self.flag = param or os.environ.get("SLM_FAULT_FILE", "")

    def _fault(self):
        if not self.flag or not os.path.exists(self.flag):
            return ""
        with open(self.flag) as fh:
            return fh.read().strip()

    def execute(self, requests):
        fault = self._fault()
        if fault.startswith("slow:"):
            time.sleep(int(fault.split(":", 1)[1]) / 1000.0)
        out = []
        for request in requests:
            if fault == "error":
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("injected fault")))
                continue
            raw = pb_utils.get_input_tensor_by_name(request, "REQUEST").as_numpy().reshape(-1)[0]
            body = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            tools = body.get("tools") or []
            if tools:
                name = tools[0].get("function", {}).get("name", "unknown")
                answer = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_0",
                            "type": "function",
                            "function": {"name": name, "arguments": "{}"},
                        }
                    ],
                }
            else:
                answer = {"role": "assistant", "content": "ok"}
            out.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(
                            "RESPONSE", np.array([[json.dumps(answer).encode()]], dtype=np.object_)
                        ),
                        pb_utils.Tensor("CONFIDENCE", np.array([[0.99]], dtype=np.float32)),
                    ]
                )
            )
        return out
