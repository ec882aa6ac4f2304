from tests.e2e.conftest import cluster  # noqa: F401 - the same fixture as the end-to-end suites
