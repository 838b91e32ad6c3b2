"""flowcore.serve on the embedded local cluster: a two-model pipeline behind
HTTP, with batching, composition by handle and a streamed response.

    python examples/serve_demo.py        # needs: pip install 'flowcore[serve]'
"""
from __future__ import annotations

import json
import urllib.request

import numpy as np

import flowcore
from flowcore import serve


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5})
class Embed:
    """A toy 'model': a fixed random projection, run on batches."""

    def __init__(self, dim: int):
        self.w = np.random.default_rng(0).standard_normal((256, dim))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def __call__(self, texts: list[str]) -> list[list[float]]:
        x = np.stack([np.frombuffer(t.encode().ljust(256)[:256], np.uint8) / 255.0
                      for t in texts])
        return (x @ self.w).tolist()


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Score:
    def __call__(self, vec: list[float]) -> float:
        return float(np.tanh(np.mean(vec)))


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Api:
    def __init__(self, embed, score):
        self.embed, self.score = embed, score

    async def __call__(self, request):
        if request.url.path.endswith("/stream"):
            def words():
                for w in request.query_params.get("text", "a b c").split():
                    yield w + "\n"
            return words()                      # a generator streams
        body = await request.json()
        vec = self.embed.remote(body["text"])   # passed on without waiting
        return {"text": body["text"], "score": await self.score.remote(vec)}


def main() -> None:
    flowcore.init(num_cpus=2)
    serve.start(http_options={"port": 0})
    serve.run(Api.bind(Embed.bind(16), Score.bind()), route_prefix="/api")
    url = serve.http_address()
    req = urllib.request.Request(url + "/api", data=json.dumps({"text": "hello"}).encode(),
                                 headers={"content-type": "application/json"})
    print(json.loads(urllib.request.urlopen(req, timeout=30).read()))
    with urllib.request.urlopen(url + "/api/stream?text=one+two+three", timeout=30) as r:
        print(r.read().decode().split())
    print(serve.status().applications["default"].status)
    serve.shutdown()
    flowcore.shutdown()


if __name__ == "__main__":
    main()
