"""The browser pages the app serves itself: static files, no build step, no CDN."""
