"""Thin v1 routes: parse, check access, call app/ helpers, shape the answer."""
