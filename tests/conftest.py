"""Shared test settings. The "mutate" hypothesis profile (tools/mutate.py passes
--hypothesis-profile=mutate) stops at the first failing example instead of shrinking it and keeps
no example database, so a planted bug is reported in seconds and leaves nothing behind."""

from __future__ import annotations

from hypothesis import Phase, settings

settings.register_profile("mutate", phases=[Phase.explicit, Phase.generate], database=None)
