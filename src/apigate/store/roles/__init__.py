"""The store's roles: one module per kind of durable entity, with its records and the interface
its users depend on.

A role is a ``typing.Protocol``, not an ABC: a user names the one role it reads or writes (the
key-hash secret needs ``SettingStore``, the delivery worker ``WebhookStore`` and ``LeaseStore``),
and anything with those methods satisfies it, so a user never depends on the whole store and a
test can hand it a small object of its own. Both backends (``sqlite.py``, ``postgres.py``) subclass
``Store``, which lists every role, so mypy checks each signature where it is implemented, and
``open_store`` returns one object that implements them all (one connection, one pool).

A new capability adds a role here (its records and its Protocol), a schema step in
``migrations.py``, its section of row codecs in ``rows.py``, its methods in both backends, and its
name to ``Store``'s bases in ``store/base.py``; the other roles stay as they are.
"""
