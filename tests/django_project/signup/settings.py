"""Settings of the test project: mail goes to Hato's outbox, nothing else is configured."""

import os

SECRET_KEY = "test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
INSTALLED_APPS = ["signup"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "signup.urls"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
TIME_ZONE = "UTC"

EMAIL_BACKEND = "hato.contrib.django.EmailBackend"
DEFAULT_FROM_EMAIL = "Sign-up Team <noreply@signup.example>"
# Read by the backend from Django's settings; the tests point it at a queue of their own
# (a name other than HATO_QUEUE_URL, to show the Django setting is what counts).
HATO_QUEUE_URL = os.environ.get("SIGNUP_OUTBOX_URL", "memory://")
# The relays' HATO_WEBHOOK_SECRET, during a rotation (both are accepted).
HATO_WEBHOOK_SECRET = "django-whsec-new,django-whsec-old"
