from django.db import models


class Account(models.Model):
    """An account's settings: what the cached pages show."""

    name = models.CharField(max_length=100)
    email = models.EmailField()
    theme = models.CharField(max_length=20, default="light")
    language = models.CharField(max_length=10, default="en")
    timezone = models.CharField(max_length=40, default="UTC")
    notifications = models.BooleanField(default=True)
    updated = models.DateTimeField(auto_now=True)
