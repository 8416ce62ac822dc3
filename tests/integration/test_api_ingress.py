"""The API as a Serve deployment (``pagoda.cluster.api.ingress:build_app``, what KubeRay runs): the ingress
replica, on the head node, serves both protocols over a handle to the engine deployment, and like
``pagoda serve`` takes its API key from ``$PAGODA_API_KEY`` when the config names none."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
grpc = pytest.importorskip("grpc")

from ray import serve

from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2_grpc as pb_grpc
from pagoda.cluster.api.ingress import API_KEY_ENV, build_app
from tests.integration.api_app import app_config


def test_ingress_deployment_serves_both_protocols(embedded_path, monkeypatch):
    args = {**app_config(str(embedded_path)).to_dict(), "api": {"http_port": 0, "grpc_port": 0}}
    with pytest.raises(ValueError, match="api.port"):
        build_app({**args, "api": {"port": 1}})
    monkeypatch.setenv(API_KEY_ENV, "k8s-secret")  # the local cluster's processes inherit it, as a pod's do
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(build_app(args), name="apitest", route_prefix=None)
        where = handle.endpoints.remote().result()
        client = openai.OpenAI(base_url=where["http"] + "/v1", api_key="k8s-secret", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="apitest", max_tokens=24, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            client.with_options(api_key="wrong").models.list()
        with grpc.insecure_channel(where["grpc"]) as ch:
            responses = list(pb_grpc.PagodaStub(ch).Generate(pb.GenerateRequest(
                text="Hello", sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True)), timeout=60,
                metadata=(("authorization", "Bearer k8s-secret"),)))
        assert responses[-1].usage.completion_tokens == 3
    finally:
        serve.shutdown()
        ray.shutdown()
