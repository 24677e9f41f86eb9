"""Schemathesis against the real server on loopback: requests generated from the server's own
OpenAPI document (valid and invalid ones) must get the statuses, content types, headers and
bodies the document promises, and never a 5xx. Bounded: a few examples per operation, tiny models.

Two expectations differ from schemathesis' defaults, both by HTTP's own rules: a body over a
limit the document states (maxItems, maxLength) is refused with 413, not 422; and a schema-valid
body may still be refused with 413 for its token count, the one limit a JSON schema cannot state
(it depends on the tokenizer)."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance
from schemathesis.config import SchemathesisConfig

REJECTED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]


@pytest.fixture(scope="module", params=("base", "classify", "qa"))
def served(request, serve_models, running, loader):
    with running(
        loader(serve_models[request.param], max_tokens=24), max_inputs=4, max_chars=200, max_queue=64
    ) as srv:
        yield srv


@pytest.fixture
def api_schema(served):
    config = SchemathesisConfig.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": REJECTED}}}
    )
    return schemathesis.openapi.from_url(served.url + "/openapi.json", config=config)


def valid_requests_are_served(ctx, response, case):
    """A schema-valid request is answered 2xx, 429 or 503 (load), or 413 for too many tokens."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code in (429, 503):
        return None
    if response.status_code >= 300:
        error = response.json()["error"]
        assert response.status_code == 413 and error["type"] == "input_too_long", response.text
        assert "tokens" in error["message"], response.text
    return None


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_server_behaves_as_its_schema_says(case):
    case.call_and_validate(
        timeout=30, excluded_checks=[positive_data_acceptance], additional_checks=[valid_requests_are_served]
    )
