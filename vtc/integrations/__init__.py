"""The old home of the lmms-eval plugin, now :mod:`vtc.apps.lmms_eval`; kept so existing imports keep working."""
