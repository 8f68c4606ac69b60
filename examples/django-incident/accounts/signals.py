"""The incident's fix, as it was written: users saw stale settings, so every account save
clears the cache. django-redis implements cache.clear() as FLUSHDB, so under real traffic
each save is one FLUSHDB — a storm of them."""

from django.core.cache import cache
from django.db.models.signals import post_save
from django.dispatch import receiver

from .models import Account


@receiver(post_save, sender=Account)
def clear_cache_on_account_save(sender, instance, **kwargs):
    cache.clear()
