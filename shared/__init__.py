"""Code common to the fedseg server and site clients.

Nothing in this package imports ``server`` or ``client``; both import it.
"""
