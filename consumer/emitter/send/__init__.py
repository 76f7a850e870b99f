"""Sending: the meter event stream client, its session, the rate limit, the dispatch of
requests and the marks of what was delivered."""
