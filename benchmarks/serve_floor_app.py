"""The serving floor's no-op chain (`serve_floor.py` deploys it beside the app): a FastAPI ingress
that parses the same JSON body as the app's POST /recommend and calls two deployments in a chain,
the first's response passed on unresolved to the second as the app passes the user's state to the
Combiner; both return constants. It is what any three-hop Serve app costs on this machine.
"""

# No `from __future__ import annotations`: FastAPI reads the no-op ingress's annotations.


def floor_app(num_cpus: float = 0.2):
    """FastAPI ingress -> First -> Second, each returning a constant: Serve's own cost of three hops.
    `num_cpus` per replica, as the app's replicas get."""
    from fastapi import FastAPI
    from pydantic import BaseModel
    from ray import serve

    api = FastAPI()

    class Body(BaseModel):
        user_id: str
        k: int = 10

    inner = dict(
        ray_actor_options={"num_cpus": num_cpus}, max_ongoing_requests=100, logging_config={"enable_access_log": False}
    )  # as the app's model stages

    @serve.deployment(**inner)
    class First:
        async def step(self, user_id: str) -> dict:
            return {"user_id": user_id, "state": [0.0] * 8}

    @serve.deployment(**inner)
    class Second:
        async def step(self, state: dict) -> dict:
            return {"user_id": state["user_id"], "items": [], "gates": {}}

    @serve.deployment(ray_actor_options={"num_cpus": num_cpus}, max_ongoing_requests=100)
    @serve.ingress(api)
    class FloorIngress:
        def __init__(self, first, second):
            self.first, self.second = first, second

        @api.get("/healthz")
        async def healthz(self) -> dict:
            return {"status": "ok"}

        @api.post("/recommend")
        async def recommend(self, body: Body) -> dict:
            return await self.second.step.remote(self.first.step.remote(body.user_id))

    return FloorIngress.bind(First.bind(), Second.bind())
