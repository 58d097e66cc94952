"""The playground page the HTTP gateway serves at `/` (package data: index.html, playground.js, playground.css)."""
