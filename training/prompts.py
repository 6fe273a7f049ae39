"""Chat prompts for self-distillation: the base model answers them and its own replies become
the training targets. Built from templates over topics and tasks, and over everyday requests,
so that the set is broad and deterministic; none of them is in bench/data/chat_prompts.txt (the
held-out evaluation set)."""

from __future__ import annotations

import random

TOPICS = [
    "photosynthesis", "black holes", "the water cycle", "compound interest", "machine learning",
    "the French Revolution", "vaccines", "climate change", "the stock market", "recursion", "DNA",
    "volcanoes", "the internet", "electricity", "the Moon landing", "gravity", "inflation", "democracy",
    "blockchain", "the human heart", "honeybees", "the Roman Empire", "plate tectonics", "solar panels",
    "neural networks", "the immune system", "rainbows", "earthquakes", "the Renaissance", "chess", "jazz",
    "the Pythagorean theorem", "prime numbers", "the speed of light", "baking bread", "meditation", "recycling",
    "ocean tides", "hurricanes", "dinosaurs", "antibiotics", "the printing press", "wind turbines",
    "cloud computing", "encryption", "coral reefs", "the Great Wall of China", "electric cars", "magnets",
    "the periodic table", "music theory", "supply and demand", "the Olympic Games", "migratory birds",
    "coffee", "public libraries", "the human brain", "glaciers", "rockets", "friendship",
    "sleep", "exercise", "healthy eating", "houseplants", "dogs", "owls", "the ocean", "deserts",
    "rainforests", "mountains", "the Sun", "Mars", "the Milky Way", "comets", "the weather", "snow",
    "thunderstorms", "bicycles", "trains", "airports", "cars", "bridges", "skyscrapers", "the Eiffel Tower",
    "ancient Egypt", "the Vikings", "the Industrial Revolution", "the Cold War", "Shakespeare", "poetry",
    "painting", "photography", "movies", "video games", "board games", "soccer", "basketball", "yoga",
    "gardening", "cooking pasta", "chocolate", "tea", "cheese", "spices", "vegetarian food", "fruit",
    "smartphones", "laptops", "social media", "email", "passwords", "robots", "artificial intelligence",
    "3D printing", "batteries", "nuclear energy", "water pollution", "forests", "bees and flowers", "sharks",
    "whales", "elephants", "penguins", "butterflies", "ants", "the moon's phases", "time zones", "calendars",
    "money", "taxes", "saving for retirement", "credit cards", "starting a business", "teamwork", "leadership",
    "public speaking", "learning a language", "reading books", "writing essays", "studying for exams",
    "mathematics", "fractions", "algebra", "geometry", "statistics", "probability", "the scientific method",
    "atoms", "chemical reactions", "evolution", "cells", "bacteria", "the skeleton", "muscles", "nutrition",
    "first aid", "the flu", "allergies", "stress", "happiness", "kindness", "volunteering", "holidays",
    "birthdays", "weddings", "camping", "hiking", "swimming", "fishing", "the beach", "cities", "villages",
    "farming", "bread", "pizza", "sushi", "ice cream", "clocks", "maps", "compasses", "lighthouses",
]

TOPIC_TEMPLATES = [
    "What is {t}?", "Explain {t} to a ten-year-old.", "Give me three interesting facts about {t}.",
    "Write a short poem about {t}.", "Why is {t} important?", "Summarize the history of {t} in a few sentences.",
    "What are the pros and cons of {t}?", "Write a short story that involves {t}.",
    "How would you explain {t} in one paragraph?", "List five questions a student might ask about {t}.",
    "What is a common misconception about {t}?", "Write a tweet about {t}.",
    "How does {t} work?", "Tell me about {t}.", "What are some tips related to {t}?", "Describe {t}.",
    "Write a haiku about {t}.", "What should a beginner know about {t}?", "Give me a fun fact about {t}.",
    "Why do people like {t}?",
]

TASKS = [
    "How do I boil an egg?", "How do I write a good resume?", "How can I save money on groceries?",
    "How do I start running as a beginner?", "How do I plant tomatoes?", "How can I be more productive at work?",
    "How do I clean a cast iron pan?", "How do I prepare for a job interview?",
    "How do I learn to play the guitar?", "How can I reduce stress?", "How do I make friends in a new city?",
    "How do I back up my computer?", "How do I write a cover letter?", "How can I drink more water during the day?",
    "How do I fold a paper airplane?", "How do I make a budget?", "How do I take care of a houseplant?",
    "How can I improve my handwriting?", "How do I make cold brew coffee?", "How do I organize my closet?",
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that returns the factorial of n.",
    "Write a Python function that counts the vowels in a string.",
    "Write a Python function that sorts a list of words by length.",
    "Write a JavaScript function that adds two numbers.", "Write a SQL query that selects all users older than 30.",
    "Write a Python function that computes Fibonacci numbers.",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    "Write a bash command that counts the lines in a file.",
    "Write a Python function that removes duplicates from a list.",
    "Write an email to my manager asking for a day off.", "Write a birthday message for my sister.",
    "Write a short product description for a reusable water bottle.", "Write a limerick about a cat.",
    "Write a motivational quote.", "Write a short speech for a friend's wedding.",
    "Write a text message inviting friends to a picnic.", "Write a review of a pizza restaurant.",
    "What is 7 times 8?", "What is the square root of 144?", "What is 25 percent of 80?",
    "Convert 100 Fahrenheit to Celsius.", "What is the capital of Japan?", "Who wrote Romeo and Juliet?",
    "How many continents are there?", "What is the largest ocean on Earth?", "What is the boiling point of water?",
    "Who painted the Mona Lisa?", "What is the tallest mountain in the world?",
    "What language is spoken in Brazil?", "Hi! How are you today?", "Tell me something fun to do on a rainy day.",
    "What should I cook for dinner tonight?", "Recommend a movie for a family night.", "Give me a riddle.",
    "What is a good name for a coffee shop?", "Suggest a weekend workout plan.",
    "What are some tips for a long road trip?", "Tell me a fun fact about space.",
    "What are good habits for students?",
]


# Everyday chat requests: what people ask a chat assistant day to day (how-to, recipes, short
# writing, names, recommendations, definitions, comparisons, small sums, code). Slot lists are
# crossed with their templates.
EVERYDAY = [
    ("How do I {x}?", [
        "make a good cup of coffee", "change a light bulb", "fix a squeaky door", "remove a coffee stain from a shirt",
        "sharpen a kitchen knife", "unclog a sink", "iron a shirt", "tie a tie", "start a vegetable garden",
        "train my puppy to sit", "make my phone battery last longer", "clean my oven", "paint a room",
        "write a good essay introduction", "make a paper boat", "hang a picture on the wall", "defrost a freezer",
        "keep my cut flowers fresh", "get rid of fruit flies", "cook rice on the stove", "make homemade pizza dough",
        "brew green tea properly", "fix a flat car tire", "jump-start a car", "pack a suitcase efficiently",
        "plan a birthday party", "make a smoothie", "learn to swim as an adult", "wash a wool sweater",
        "remove rust from a bike chain", "set up a home Wi-Fi network", "take a screenshot on a laptop",
        "make a budget spreadsheet", "care for a cactus", "fall asleep faster", "stop procrastinating",
        "make scrambled eggs", "ask for a raise", "negotiate the price of a used car", "clean white sneakers",
        "make a campfire safely", "read a map", "memorize a speech", "write a haiku", "say no politely",
        "grow herbs on a windowsill", "make lemonade from scratch", "roast vegetables", "descale a kettle",
        "organize my desk", "meal prep for the week", "choose a good watermelon", "make a birthday card",
    ]),
    ("Give me a simple recipe for {x}.", [
        "banana bread", "tomato soup", "guacamole", "chocolate chip cookies", "a vegetable stir fry", "french toast",
        "hummus", "a Greek salad", "mashed potatoes", "spaghetti with garlic and oil", "lentil soup", "omelettes",
        "chicken curry", "fried rice", "a fruit salad", "oatmeal", "brownies", "a grilled cheese sandwich",
        "pesto", "roasted chicken", "waffles", "apple crumble", "pizza margherita", "a berry smoothie",
        "vegetable soup", "tacos", "muffins", "a tuna sandwich", "a potato salad", "hot chocolate",
    ]),
    ("Write a {x}.", [
        "haiku about the first snow", "short poem about the sea", "limerick about a dog", "haiku about a city at night",
        "short poem about friendship", "haiku about spring rain", "short story about a lost key",
        "poem about a morning walk", "haiku about coffee", "short poem about the stars",
        "four-line poem about a garden", "short story about a robot who learns to paint", "haiku about a mountain lake",
        "limerick about a teacher", "short poem about home", "haiku about summer heat",
        "short bedtime story about a brave mouse", "poem about the wind", "haiku about a train journey",
        "short poem about growing older", "thank-you note to a friend who helped me move",
        "short note to a coworker who is leaving", "message congratulating a friend on a new job",
        "polite email asking a teacher for an extension", "short apology to a friend for missing their party",
        "welcome message for a new team member", "get-well-soon card for my grandmother",
        "note to my landlord about a broken heater", "toast for my parents' anniversary",
        "short invitation to a housewarming party", "reply declining a meeting invitation",
        "short bio for a personal website", "text asking a friend to lunch",
    ]),
    ("Suggest a few names for {x}.", [
        "a pet hamster", "a new bakery", "a black cat", "a book club", "a fantasy kingdom", "a sailboat",
        "a podcast about science", "a soccer team", "a golden retriever puppy", "a coffee shop by the beach",
        "a band", "a pet turtle", "a robot character", "a small bookstore", "a garden blog", "a parrot",
    ]),
    ("Can you recommend {x}?", [
        "a good movie for a rainy evening", "a board game for four people", "a book for someone who likes mysteries",
        "a hobby I can do at home", "a gift for my dad", "some music to study to", "a podcast for a long drive",
        "a good houseplant for beginners", "an easy dessert for a dinner party", "a fun activity for kids",
        "a way to learn programming", "a good exercise for back pain", "a classic novel to start with",
        "a weekend trip idea", "a healthy snack for work",
    ]),
    ("Tell me a joke about {x}.", [
        "cats", "math", "coffee", "the weather", "teachers", "dogs", "pizza", "programmers", "the ocean", "music",
        "bananas", "robots", "school", "vegetables", "dinosaurs",
    ]),
    ("What should I pack for {x}?", [
        "a beach holiday", "a business trip", "a ski trip", "a day hike", "a long flight", "a music festival",
        "a week in London", "a road trip", "a picnic", "a trip to the mountains",
    ]),
    ("What are some {x}?", [
        "easy lunch ideas", "good habits to start in the morning", "fun things to do in the summer",
        "ways to save energy at home", "tips for a job interview", "quick dinner ideas", "ways to relax after work",
        "healthy snacks", "tips for learning to cook", "ideas for a rainy day with kids", "ways to be more creative",
        "good questions to ask on a first date", "tips for taking better photos", "cheap date ideas",
        "ways to make new friends", "tips for studying", "ways to reduce plastic waste", "vegetarian dinner ideas",
    ]),
    ("What is the difference between {x}?", [
        "a virus and bacteria", "a lake and a pond", "baking soda and baking powder", "a crocodile and an alligator",
        "a hurricane and a tornado", "weight and mass", "a frog and a toad", "speed and velocity",
        "a democracy and a republic", "RAM and storage", "a meteor and a meteorite", "a cold and the flu",
        "jam and jelly", "an ape and a monkey", "a rabbit and a hare", "a simile and a metaphor",
    ]),
    ("Why do {x}?", [
        "dogs wag their tails", "birds sing in the morning", "leaves change color in autumn", "we yawn",
        "onions make us cry", "stars twinkle", "cats knead with their paws", "we dream", "the sky turn red at sunset",
        "bread go stale", "ice cubes float", "our ears pop on airplanes", "zebras have stripes",
        "people get hiccups", "bees make honey",
    ]),
    ('What does the word "{x}" mean?', [
        "serendipity", "ubiquitous", "nostalgia", "resilient", "meticulous", "ambiguous", "candid", "pragmatic",
        "eloquent", "benevolent", "melancholy", "curious", "frugal", "tenacious", "whimsical", "diligent",
    ]),
    ("Describe {x}.", [
        "a busy market in the morning", "a quiet forest after rain", "a snowy village at night",
        "a summer thunderstorm",
        "the view from a mountain top", "a cozy library", "a lighthouse in a storm", "a field of sunflowers",
        "a crowded train station", "a sunrise in the desert", "an old kitchen", "a night sky full of stars",
    ]),
    ("How can I {x}?", [
        "improve my memory", "be a better listener", "eat more vegetables", "stop biting my nails",
        "get better at chess", "wake up earlier", "speak more confidently", "keep my house tidy",
        "improve my posture", "learn faster", "spend less time on my phone", "make my mornings less stressful",
        "become a better cook", "keep my plants alive", "focus while working from home",
    ]),
    ("Explain what {x} does.", [
        "a router", "a thermostat", "the liver", "a compiler", "a battery", "the heart", "an operating system",
        "a web browser", "a search engine", "the lungs", "a GPU", "a firewall", "a spreadsheet", "the kidneys",
    ]),
    ("Write a Python function that {x}.", [
        "checks whether a word is a palindrome", "returns the largest number in a list",
        "converts Celsius to Fahrenheit",
        "counts the words in a sentence", "flattens a list of lists", "merges two dictionaries",
        "returns the sum of the digits of a number", "checks whether a year is a leap year", "capitalizes every word",
        "finds the most common element in a list", "computes the average of a list", "reverses the words in a sentence",
    ]),
]
# small sums, products and conversions, with numbers fixed by a seeded generator
ARITHMETIC = ["What is {a} multiplied by {b}?", "What is {a} plus {b}?", "What is {a} minus {b}?",
              "What is {a} divided by {b}?", "Convert {a} kilometers to miles.", "What is {b} percent of {a}?"]


# the ways one request is put (replies differ in length and form)
STYLES = ["{p}", "{p} Keep it short.", "Quick question: {p}", "{p} Please explain step by step.",
          "Hi! {p} Thanks!"]


def everyday_prompts(seed: int = 0) -> list[str]:
    """The everyday requests: every slot of every family in every style, and 120 small
    arithmetic questions (no repeats)."""
    out = [style.format(p=tpl.format(x=x)) for tpl, slots in EVERYDAY for x in slots for style in STYLES]
    rng = random.Random(seed)
    for i in range(120):
        out.append(ARITHMETIC[i % len(ARITHMETIC)].format(a=rng.randint(11, 99), b=rng.randint(2, 20)))
    return list(dict.fromkeys(out))


def subjects() -> dict[str, str]:
    """Each training prompt's subject (its topic, or its everyday request whatever the style):
    held-out data kept apart by subject measures the heads on subjects they were not trained on."""
    out = {tpl.format(t=t): t for t in TOPICS for tpl in TOPIC_TEMPLATES}
    out.update({p: p for p in TASKS})
    for tpl, slots in EVERYDAY:
        for x in slots:
            base = tpl.format(x=x)
            out.update({style.format(p=base): base for style in STYLES})
    return {p: out.get(p, p) for p in training_prompts()}


def training_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """The topic prompts (topics x templates, then the tasks) and the everyday requests, each
    set shuffled, then taken in turn from both while both last; the first ``n``. The topic
    prompts keep the order they had before the everyday ones were added (replies cached for
    them stay usable)."""
    topics = [tpl.format(t=t) for t in TOPICS for tpl in TOPIC_TEMPLATES] + TASKS
    random.Random(seed).shuffle(topics)
    everyday = everyday_prompts(seed)
    random.Random(seed + 1).shuffle(everyday)
    prompts = [p for pair in zip(topics, everyday) for p in pair]
    prompts = list(dict.fromkeys(prompts + topics[len(everyday):] + everyday[len(topics):]))
    return prompts[:n] if n else prompts


# ---- prompts for measuring an acceptance profile ------------------------------------------------
# Subjects in no training prompt (and not in the benchmark's prompts): the heads' acceptance
# over a cache other than the one they were trained on (training/medusa.py --profile-over) is
# measured on replies to these, on subjects the heads never saw.
PROFILE_TOPICS = [
    "lightning", "the Silk Road", "origami", "submarines", "the Amazon River", "octopuses", "windmills",
    "the telescope", "fermentation", "the Aztecs", "tsunamis", "kites", "bamboo", "the metric system",
    "sign language", "fireflies", "the Sahara", "hot air balloons", "caves", "tornadoes", "mushrooms",
    "the violin", "knitting", "the Arctic", "crossword puzzles", "pottery", "the Titanic", "dolphins",
    "lighthouse keepers", "the human eye", "circuses", "marathons", "wolves", "canals", "the Andes",
    "salt", "glassblowing", "parrots", "moss", "the piano", "astronauts", "castles", "frogs", "quilts",
    "the postal service", "geysers", "typewriters", "the Northern Lights",
]

PROFILE_REQUESTS = [
    ("How do I {x}?", [
        "polish leather shoes", "repot an orchid", "make a paper lantern", "fix a dripping tap", "clean a keyboard",
        "wrap a present neatly", "start journaling", "patch a hole in drywall", "choose running shoes",
        "keep a sourdough starter alive", "sew on a button", "teach a child to ride a bike", "store fresh herbs",
        "make pancakes from scratch", "calm down before an exam", "pick a ripe avocado", "clean a microwave",
        "care for a goldfish",
    ]),
    ("Can you recommend {x}?", [
        "a card game for two people", "a science fiction novel for a teenager", "a quiet place to read in a city",
        "a warm drink for a cold night", "a simple workout for a busy week", "a present for a ten-year-old",
    ]),
    ("Write a {x}.", [
        "haiku about a foggy harbor", "short poem about a red umbrella", "limerick about a clumsy penguin",
        "note thanking a bus driver", "short story about a forgotten library book", "postcard from a seaside town",
    ]),
    ("Why {x}?", [
        "do onions make people cry", "is the sea salty", "do leaves change color in the fall",
        "do soap bubbles pop", "do kettles whistle", "does bread go stale",
    ]),
    ("What is the difference between {x}?", [
        "a hare and a rabbit", "a violin and a viola", "a virus and a bacterium", "a harbor and a port",
        "an alligator and a crocodile", "a stew and a soup",
    ]),
]


def profile_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """Prompts on PROFILE_TOPICS (the topic templates) and the PROFILE_REQUESTS (in every
    style), each set shuffled, then taken in turn from both (a profile of chat replies: questions
    and requests as much as topics); the first ``n``."""
    topics = [t.format(t=topic) for topic in PROFILE_TOPICS for t in TOPIC_TEMPLATES]
    requests = [style.format(p=tpl.format(x=x)) for tpl, slots in PROFILE_REQUESTS for x in slots for style in STYLES]
    random.Random(seed).shuffle(topics)
    random.Random(seed + 1).shuffle(requests)
    out = [p for pair in zip(topics, requests) for p in pair] + topics[len(requests):]
    return out[:n] if n else out
