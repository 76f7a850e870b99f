"""The deployment artifacts (image, compose, Helm chart, alerts, dashboard), each checked by
its real tool."""
