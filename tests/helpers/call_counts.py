"""Counting the calls of functions, to see which route ran."""

import collections


def count_calls(monkeypatch, owner, names) -> collections.Counter:
    """Wraps each function `owner.<name>` of `names` so that its calls are counted, by name, in the returned Counter."""
    calls = collections.Counter()
    for name in names:

        def counted(*args, _name=name, _function=getattr(owner, name), **kwargs):
            calls[_name] += 1
            return _function(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    return calls
