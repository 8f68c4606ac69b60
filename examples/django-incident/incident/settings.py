"""Settings of the incident's Django project: sqlite as the database, django-redis as the
cache. Both locations come from the environment, so the same project runs against Redis
directly and through stormwall — the app changes nothing but its Redis URL."""

import os

SECRET_KEY = "django-incident-example-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = ["accounts"]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("INCIDENT_DB", "/tmp/django-incident.sqlite3"),
        "OPTIONS": {
            # Readers, savers and the loader are separate processes: WAL lets reads go on
            # during a save's write, IMMEDIATE takes the write lock at BEGIN (no upgrade
            # deadlocks), and a lock is waited for instead of failing at once.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
        },
    }
}

CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": os.environ.get("CACHE_URL", "redis://127.0.0.1:6379/0"),
        # The incident's cache kept account settings for five minutes.
        "TIMEOUT": 300,
        "OPTIONS": {
            "CLIENT_CLASS": "django_redis.client.DefaultClient",
            # A web app's usual bounds; a cache call past them raises (and is counted).
            "SOCKET_CONNECT_TIMEOUT": 5,
            "SOCKET_TIMEOUT": 5,
        },
    }
}
