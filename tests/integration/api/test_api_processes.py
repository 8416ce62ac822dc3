"""``api.num_servers``: more API processes (Ray actors on this node) serving the same ports with SO_REUSEPORT,
over the package's running replica (api/conftest.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")
openai = pytest.importorskip("openai")

import ray

from pagoda.cluster.api.config import ApiConfig
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2_grpc as pb_grpc
from pagoda.cluster.api.server import ApiServers
from pagoda.cluster.api.server_pool import start_more_servers, stop_servers


def _complete(url: str) -> str:
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        r = client.completions.create(model="apitest", prompt="The capital of France is", max_tokens=4, temperature=0)
    return r.choices[0].text


def _generate(target: str) -> str:
    with grpc.insecure_channel(target) as channel:  # a new channel: a new connection
        responses = pb_grpc.PagodaStub(channel).Generate(
            pb.GenerateRequest(text="The capital of France is", sampling=pb.SamplingParams(max_tokens=4, temperature=0.0)), timeout=60)
        return "".join(r.text for r in responses)


def test_a_second_process_serves_the_same_ports_and_admits_its_share(app):
    config, handle, _ = app
    first = ApiServers.start(handle, config, ApiConfig(http_port=0, grpc_port=0, num_servers=2,
                                                       max_concurrent_requests=9))
    more = []
    try:
        more = start_more_servers(handle, config, first)
        assert len(more) == 1
        assert ray.get(more[0].ports.remote()) == (first.http_port, first.grpc_port)
        assert first.frontend.max_in_flight == 5  # its share of 9
        both = (_complete(first.http_url), _generate(first.grpc_target))
        assert all(both), both
        first.stop()  # only the other process listens now: new connections on the same ports reach it
        assert (_complete(first.http_url), _generate(first.grpc_target)) == both
    finally:
        stop_servers(more)
        first.stop()
    with pytest.raises(openai.APIConnectionError):  # and with it gone, nobody does
        _complete(first.http_url)
