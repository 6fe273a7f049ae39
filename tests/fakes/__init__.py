"""Fakes shared by the tests: a fake engine worker, a fake model hub."""
