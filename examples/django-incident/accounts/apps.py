from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"

    def ready(self):
        # Connects the post_save receiver that clears the cache.
        from . import signals  # noqa: F401
