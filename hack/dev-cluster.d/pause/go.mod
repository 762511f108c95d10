module pgw-dev-pause

go 1.24
