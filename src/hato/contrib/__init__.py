"""Integrations with web frameworks: ``hato.contrib.django`` (an email backend)."""
