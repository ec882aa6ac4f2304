import pytest

from tests.e2e.harness import Cluster


@pytest.fixture
def cluster(request):
    with Cluster(job_id=f"e2e-{request.node.name[:40].replace('[', '-').replace(']', '')}") as c:
        yield c
