"""The store's roles: one module per kind of durable entity, with its records and the interface
its users depend on.

A role is a ``typing.Protocol``, not an ABC: a user names the one role it reads or writes (the
key-hash secret needs ``SettingStore``, the delivery worker ``WebhookStore`` and ``LeaseStore``),
and anything with those methods satisfies it, so a user never depends on the whole store and a
test can hand it a small object of its own. The backends (``store/sqlite/``, ``store/postgres/``)
subclass every role explicitly, so mypy checks each signature where it is implemented, and
``open_store`` returns one object that implements them all (one connection, one pool).

A new capability adds a role here (its records and its Protocol), a schema step in
``migrations.py``, its row codecs in ``rows.py``, one module per backend, and the role to ``Store``
in ``store/__init__.py``; the other roles stay as they are.
"""
