"""Fakes of outside services (cloud metadata) that tests run on 127.0.0.1."""
