"""The hardening suite (issue 7): a package, so its real server lives only while it runs."""
