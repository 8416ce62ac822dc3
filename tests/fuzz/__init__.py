"""Fuzzing pagoda's two front doors (issue #16, item 7): what to send, and what may come back.

    from tests.fuzz.cases import draw_mix
    from tests.fuzz.clients import fuzz_http
    from tests.fuzz.http_cases import http_cases

    cases = draw_mix(http_cases(vocab_size=49152), n=500, seed_=0)      # the same 500 every run
    outcomes = asyncio.run(fuzz_http("http://127.0.0.1:8000", cases, concurrency=8))

- ``cases``: HttpCase / GrpcCase (the bytes on the wire, and how they were made) and the seeded drawing;
- ``values``: the leaves: odd JSON values and unicode, edge numbers, nesting, images good and bad;
- ``http_cases``: OpenAI bodies for /v1/completions and /v1/chat/completions, and raw malformed ones;
- ``grpc_cases``: pagoda.v1 messages over each field's whole range, and bytes that are no message;
- ``contract``: the documented answers (DESIGN.md, cluster/api/errors.py) and the checks of one answer;
- ``clients``: send a case as it is, under a hang guard, and check its answer;
- ``review``: a run summed up, errors the servers logged, engine idle and still serving afterwards;
- ``known_bugs``: server bugs found and not fixed yet, which the runs set aside (each with a failing test; none open).

Used by tests/integration/test_fuzz_api.py and images/test_fuzz_images.py (500 per protocol) and ``python -m
bench.fuzz`` (10,000 per protocol).
"""
